import sys

from train.main import main

if __name__ == "__main__":      # guarded: spawned worker processes (latent encoding) re-import this module
    sys.exit(main())
