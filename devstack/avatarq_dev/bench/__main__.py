"""`python -m avatarq_dev.bench`: the benchmark as a script (same options as `avatarq bench`)."""

from avatarq_dev.bench import main

raise SystemExit(main())
