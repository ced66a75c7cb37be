import sys

from kktd.cli import main

sys.exit(main())
