// Greedy generation in llama.cpp (node-llama-cpp's prebuilt CPU binary, never
// built or downloaded) from a GGUF depthc wrote, on token ids, with the
// next-token logits after the prompt:
//
//   node generate.mjs MODEL.gguf N IDS LOGITS_OUT
//
// IDS: the prompt's token ids, comma-separated (BOS included when the model
// wants one: nothing is added). Generates N tokens greedily (stops early at
// an end-of-generation token) with a float32 KV cache and no flash attention,
// so that llama.cpp computes what the reference computes; writes the logits
// after the prompt to LOGITS_OUT (float32 little-endian, one per vocabulary
// id) and prints one JSON object: {"tokens": [...], "n_vocab": V}.
import fs from "node:fs";
import { getLlama, LlamaLogLevel } from "node-llama-cpp";

const [modelPath, n, ids, logitsOut] = process.argv.slice(2);
const prompt = ids.split(",").map(Number);
const llama = await getLlama({
  gpu: false,
  build: "never",
  usePrebuiltBinaries: true,
  skipDownload: true,
  progressLogs: false,
  maxThreads: 2,
  logLevel: LlamaLogLevel.error,
});
const model = await llama.loadModel({ modelPath, gpuLayers: 0 });
const context = await model.createContext({
  contextSize: 512,
  batchSize: 512,
  sequences: 1,
  threads: 2,
  flashAttention: false,
  experimentalKvCacheKeyType: "F32",
  experimentalKvCacheValueType: "F32",
});
const seq = context.getSequence();
const next = { generateNext: { token: true, logits: true, options: { temperature: 0 } } };
const last = prompt.length - 1;
let out = (await seq.controlledEvaluate(prompt.map((t, i) => (i < last ? t : [t, next]))))[last];
let vocab = 0;
for (const t of out.next.logits.keys()) vocab = Math.max(vocab, t + 1);
const dense = new Float32Array(vocab).fill(-Infinity);
for (const [t, l] of out.next.logits) dense[t] = l;
fs.writeFileSync(logitsOut, Buffer.from(dense.buffer));
const tokens = [];
let tok = out.next.token;
while (tok != null && tokens.length < Number(n)) {
  tokens.push(tok);
  if (model.isEogToken(tok) || tokens.length >= Number(n)) break;
  out = (await seq.controlledEvaluate([[tok, { generateNext: { token: true, options: { temperature: 0 } } }]]))[0];
  tok = out.next.token;
}
process.stdout.write(JSON.stringify({ tokens, n_vocab: vocab }) + "\n");
await context.dispose();
await model.dispose();
await llama.dispose();
