from spark_quant.cli import main

raise SystemExit(main())
