// Greedy answers from llama.cpp (node-llama-cpp's prebuilt CPU build) for lorakit's export tests.
// Usage: node run.mjs job.json  ->  JSON on stdout.
// job: {model, lora?: [{path, scale}], prompts: [[token ids]], max_tokens, texts?: [strings to tokenize]}
// out: {answers: [[token ids]], first_probs: [{id: prob}] (top 5 of the first step), tokenized: [[ids]]}
import {readFileSync} from "node:fs";
import {getLlama} from "node-llama-cpp";

const job = JSON.parse(readFileSync(process.argv[2], "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const model = await llama.loadModel({modelPath: job.model});
const lora = job.lora ? {adapters: job.lora.map((a) => ({filePath: a.path, scale: a.scale ?? 1}))} : undefined;
const context = await model.createContext({threads: job.threads ?? 2, contextSize: job.context ?? 512, lora});
const answers = [], firstProbs = [];
const seq = context.getSequence();
for (const prompt of job.prompts) {
  await seq.clearHistory();
  const out = [];
  let first = true;
  for await (const step of seq.evaluateWithMetadata(prompt, {probabilities: first}, {temperature: 0})) {
    if (first) {
      const top = [...step.probabilities.entries()].sort((a, b) => b[1] - a[1]).slice(0, 5);
      firstProbs.push(Object.fromEntries(top));
      first = false;
    }
    if (model.isEogToken(step.token)) break;
    out.push(step.token);
    if (out.length >= job.max_tokens) break;
  }
  answers.push(out);
}
const tokenized = (job.texts ?? []).map((t) => [...model.tokenize(t, true)]);
console.log(JSON.stringify({answers, first_probs: firstProbs, tokenized}));
await context.dispose();
await model.dispose();
