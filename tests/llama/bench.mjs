// Prefill and decode speed of two GGUFs in llama.cpp (node-llama-cpp's
// prebuilt CPU binary), measured back to back in alternating rounds:
//
//   node bench.mjs A.gguf B.gguf ROUNDS PROMPT_TOKENS DECODE_TOKENS THREADS [flash]
//
// Each round, for A then B (B then A on odd rounds): a fresh context, the
// prompt (PROMPT_TOKENS ids cycling through the first thousand of the
// vocabulary after BOS) evaluated in one batch, then DECODE_TOKENS greedy
// tokens one at a time. Llama.cpp's defaults otherwise (its F16 KV cache);
// `flash`: flash attention (without it, llama.cpp pads every layer's V cache
// to the widest layer's when their widths differ, as a `deci` file's do).
// Prints one JSON object: per model, per round, prefill and decode tokens/s.
import { getLlama, LlamaLogLevel } from "node-llama-cpp";

const [a, b, rounds, promptTokens, decodeTokens, threads, fa] = process.argv.slice(2);
const flash = fa === "flash";
const llama = await getLlama({
  gpu: false,
  build: "never",
  usePrebuiltBinaries: true,
  skipDownload: true,
  progressLogs: false,
  maxThreads: Number(threads),
  logLevel: LlamaLogLevel.error,
});
const models = {};
for (const [name, path] of [["a", a], ["b", b]]) {
  models[name] = await llama.loadModel({ modelPath: path, gpuLayers: 0 });
}
const n = Number(promptTokens);
const result = { a: { prefill: [], decode: [] }, b: { prefill: [], decode: [] } };
for (let r = 0; r < Number(rounds); r++) {
  for (const name of r % 2 === 0 ? ["a", "b"] : ["b", "a"]) {
    const model = models[name];
    const ctx = await model.createContext({
      contextSize: n + Number(decodeTokens) + 8,
      batchSize: n,
      sequences: 1,
      threads: Number(threads),
      flashAttention: flash,
    });
    const seq = ctx.getSequence();
    const prompt = [model.tokens.bos ?? 1];
    for (let i = 1; i < n; i++) prompt.push(1 + (i % 1000));
    const last = prompt.length - 1;
    const next = { generateNext: { token: true, options: { temperature: 0 } } };
    let t0 = performance.now();
    let out = (await seq.controlledEvaluate(prompt.map((t, i) => (i < last ? t : [t, next]))))[last];
    result[name].prefill.push(n / ((performance.now() - t0) / 1000));
    let tok = out.next.token;
    t0 = performance.now();
    for (let i = 0; i < Number(decodeTokens); i++) {
      out = (await seq.controlledEvaluate([[tok, next]]))[0];
      tok = out.next.token;
    }
    result[name].decode.push(Number(decodeTokens) / ((performance.now() - t0) / 1000));
    await ctx.dispose();
  }
}
process.stdout.write(JSON.stringify(result) + "\n");
for (const m of Object.values(models)) await m.dispose();
await llama.dispose();
