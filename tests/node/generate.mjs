// Greedy generation with transformers.js in Node from a directory depthc
// wrote, loaded the way a user loads a model folder: no subfolder, no dtype,
// no file names, only "local files, no hub".
//
//   node generate.mjs DIR N TEXT
//
// Tokenizes TEXT with the folder's tokenizer (no special tokens), generates
// N tokens greedily, prints one JSON object:
//   {"prompt_ids": [...], "tokens": [the generated ids], "decoded_prompt": "..."}
import path from "node:path";
import { AutoModelForCausalLM, AutoTokenizer, env } from "@huggingface/transformers";

const [dir, n, text] = process.argv.slice(2);
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(path.resolve(dir));
const id = path.basename(path.resolve(dir));

const tokenizer = await AutoTokenizer.from_pretrained(id);
const model = await AutoModelForCausalLM.from_pretrained(id);
const inputs = tokenizer(text, { add_special_tokens: false });
const prompt = Array.from(inputs.input_ids.data, Number);
const out = await model.generate({ ...inputs, max_new_tokens: Number(n), do_sample: false });
const tokens = Array.from(out.data, Number).slice(prompt.length);
process.stdout.write(
  JSON.stringify({ prompt_ids: prompt, tokens, decoded_prompt: tokenizer.decode(prompt) }) + "\n",
);
