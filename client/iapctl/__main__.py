from iapctl.cli import main

raise SystemExit(main())
