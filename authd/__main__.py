from authd.cli import main

raise SystemExit(main())
