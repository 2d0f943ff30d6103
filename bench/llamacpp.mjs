// llama.cpp (node-llama-cpp's prebuilt CPU binary) for tests/test_interop.py and bench/llamacpp.py.
//   node bench/llamacpp.mjs REQUEST.json   ->  one JSON line on stdout
// REQUEST: {"threads": 1, "context": 256, "models": [{"path": "x.gguf",
//              "generate": [{"prompt": [ids], "steps": N}],   greedy tokens after each prompt, with timings
//              "tokenize": ["text", ...]}]}                   llama.cpp's tokens of each text (no BOS)
// RESULT:  {"models": [{"generate": [{"tokens": [...], "prompt_s": s, "generate_s": s, "prompt_cpu_s": s,
//                                      "generate_cpu_s": s}], "tokenize": [[...]]}],
//           "cpu_backend": "libggml-cpu-zen4.so"}   the CPU variant ggml loaded (the best this CPU runs, of those present)
// prompt_s times the prompt but its last token; generate_s the last prompt token and the N greedy steps after it.
// One process for all models: node-llama-cpp's start (it test-loads its binary in a child process) takes seconds.
import {readFileSync} from "node:fs";
import {basename} from "node:path";
import {getLlama} from "node-llama-cpp";

const request = JSON.parse(readFileSync(process.argv[2], "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
const contextSize = request.context ?? 256;
const results = [];
for (const job of request.models) {
    const model = await llama.loadModel({modelPath: job.path, gpuLayers: 0});
    const context = await model.createContext({contextSize, batchSize: contextSize, threads: request.threads ?? 1});
    const result = {generate: [], tokenize: []};
    for (const run of job.generate ?? []) {
        const sequence = context.getSequence();
        const cpuStarted = process.cpuUsage(), started = performance.now();
        await sequence.evaluateWithoutGeneratingNewTokens(run.prompt.slice(0, -1));
        const prompted = performance.now(), cpuPrompted = process.cpuUsage();
        const tokens = [];
        for await (const token of sequence.evaluate(run.prompt.slice(-1), {temperature: 0})) {
            tokens.push(token);
            if (tokens.length >= run.steps) break;
        }
        const done = performance.now(), cpuDone = process.cpuUsage();
        const cpuSeconds = (from, to) => (to.user + to.system - from.user - from.system) / 1e6; // the whole process's
        result.generate.push({tokens, prompt_s: (prompted - started) / 1000, generate_s: (done - prompted) / 1000,
                              prompt_cpu_s: cpuSeconds(cpuStarted, cpuPrompted), generate_cpu_s: cpuSeconds(cpuPrompted, cpuDone)});
        sequence.dispose();
    }
    for (const text of job.tokenize ?? []) {
        result.tokenize.push(Array.from(model.tokenize(text)));
    }
    results.push(result);
    await context.dispose();
    await model.dispose();
}
// The ggml CPU library mapped into this process (Linux only; null elsewhere).
function cpuBackend() {
    try {
        return readFileSync("/proc/self/maps", "utf8").split("\n").map((line) => basename(line.trim().split(/\s+/).pop() ?? ""))
            .find((name) => name.startsWith("libggml-cpu")) ?? null;
    } catch {
        return null;
    }
}
console.log(JSON.stringify({models: results, cpu_backend: cpuBackend()}));
await llama.dispose();
