def main(argv=None):
    print("lazymerge")
