#!/bin/sh
# Run nzp under valgrind memcheck (used by `make valgrind` for the CLI tests):
# any memory error or definite leak makes the command exit 99.
exec valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite \
    "${NZP_REAL:?set NZP_REAL to the nzp binary}" "$@"
