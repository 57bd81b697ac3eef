"""`python -m avatarq_dev.livekit_server`: run the dev LiveKit-protocol server."""

from .cli import main

raise SystemExit(main())
