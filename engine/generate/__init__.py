"""Text generation: batched decoding with a KV cache (engine.generate.generator) under sampling
parameters as vLLM defines them (engine.generate.params, torch-free), shared by the synthesize
stage, the server and evaluation."""
