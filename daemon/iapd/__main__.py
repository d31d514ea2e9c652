from iapd.cli import main

raise SystemExit(main())
