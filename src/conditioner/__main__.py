from conditioner.cli import main

raise SystemExit(main())
