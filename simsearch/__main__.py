from simsearch.cli import main

raise SystemExit(main())
