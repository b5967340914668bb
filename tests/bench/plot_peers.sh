#!/usr/bin/env bash
# Plot bench_peers' TSV (system, threads, bits/weight, G weights/s) with gnuplot:
# weights/s against bits/weight, one point per system and thread count.
#   bash tests/bench/plot_peers.sh build/bench_peers.tsv docs/bench_peers.png
set -euo pipefail
tsv=$1 png=$2
data=$(mktemp)
trap 'rm -f "$data"' EXIT
# gnuplot reads whitespace-separated columns: quote the system names
awk -F'\t' 'NR > 1 { printf "\"%s\" %s %s %s\n", $1, $2, $3, $4 }' "$tsv" > "$data"
gnuplot <<PLOT
set terminal pngcairo size 1100,700 font "sans,11" noenhanced
set output "$png"
set title "Batch-1 GEMV over matrices far beyond the LLC (make bench-peers)"
set xlabel "stored bits per weight"
set ylabel "G weights / s"
set grid
set key off
set xrange [0:38]
set yrange [0:*]
plot "$data" using 3:(\$2 == 1 ? \$4 : 1/0) with points pt 7 ps 1.6 lc rgb "#1f77b4", \
     "$data" using 3:(\$2 == 2 ? \$4 : 1/0) with points pt 5 ps 1.6 lc rgb "#d62728", \
     "$data" using 3:4:(sprintf("%s, %d thr", stringcolumn(1), \$2)) with labels offset char 1,0.6 left font "sans,9"
PLOT
echo "wrote $png (circles: 1 thread, squares: 2 threads)"
