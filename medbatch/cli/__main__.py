import sys

from medbatch.cli import main

sys.exit(main())
