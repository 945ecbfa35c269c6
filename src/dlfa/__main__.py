import sys

from dlfa.cli.main import main

sys.exit(main())
