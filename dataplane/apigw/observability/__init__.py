"""What on-call reads: Prometheus metrics and JSON logs (access lines, flood control)."""
