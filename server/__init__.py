"""lazymerge.server"""
