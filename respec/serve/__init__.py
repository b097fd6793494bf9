"""The HTTP rollout server (`respec serve`): SGLang's native routes and OpenAI's completions over the slot engine.
Stands on `respec.engine` alone; needs the `serve` extra (fastapi, uvicorn)."""
