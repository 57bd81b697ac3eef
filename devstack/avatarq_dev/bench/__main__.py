"""`python -m avatarq.dev.bench`: the benchmark as a script (same options as `avatarq bench`)."""

from avatarq.dev.bench import main

raise SystemExit(main())
