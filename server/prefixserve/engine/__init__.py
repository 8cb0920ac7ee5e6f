"""The serving engine: sequences, scheduler, model runner, sampler and the step loop. Knows nothing of HTTP."""
