"""The request path: the config compiled into ready state, route matching, the pipeline
(`handler`, top to bottom) and forwarding to the backend (`proxy`)."""
