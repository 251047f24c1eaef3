"""`python -m rlt_pl {fit,validate,test,predict} -c CONFIG.yaml`."""

from rlt_pl.cli import cli_main

if __name__ == "__main__":
    cli_main()
