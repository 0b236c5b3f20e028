import sys

from sane_hf.cli import main

sys.exit(main())
