import sys

from prefuse.cli import main

sys.exit(main())
