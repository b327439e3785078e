from conditioner.app.cli import main

raise SystemExit(main())
