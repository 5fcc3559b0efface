"""The remote half of rmidl: the worker contract (typed records + Protocol) and its blobs, registry naming,
the wire format, shared memory, the bulk channel, Pyro5 transport and security. Both `rmidl.server` and
`rmidl.client` build on it; it imports neither."""
