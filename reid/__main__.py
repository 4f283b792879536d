"""`python -m reid`: what torchrun starts (`torchrun --nproc_per_node=4 -m reid train ...`)."""

from .cli import main

raise SystemExit(main())
