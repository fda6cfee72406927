"""Streaming inference: broker events in, predictions out, at least once.

`connector` defines the small interface every broker implements (`redis_streams`, `kafka`);
`codec` turns events into model inputs and predictions into output events; `worker` runs the loop
(micro-batching, retries, dead-letter queue, ordered acknowledgements, drain on SIGTERM).
"""
