"""Rate limits kept in Redis (or Valkey), shared by every edge.

``limits`` (what a key may do), ``scripts`` (the Lua and the key layout), ``breaker`` and
``buckets`` (the Redis client: timeouts, NOSCRIPT reload, circuit breaker), ``admission``
(admit, settle, lease renewal), ``charge`` (one request's charge: acquired once, settled
once), ``headers`` (OpenAI's x-ratelimit-*), ``http`` (the middleware and headers).
"""
