"""`python -m rlt_pl {fit,validate,test,predict} -c CONFIG.yaml`."""

from rlt_pl.cli import main

if __name__ == "__main__":
    main()
