"""lazymerge.search"""
