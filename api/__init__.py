"""The HTTP API's shared parts, below the server and the feedback channel: OpenAI's chat protocol types, errors in
its shape, and the server's Prometheus metrics."""
