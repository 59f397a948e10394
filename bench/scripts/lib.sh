# shellcheck shell=bash
# Shared by the bench scripts (source it; it defines functions only).

# Exits 2 naming the build command when any of the given binaries is missing.
need_bins() {
    local bin
    for bin in "$@"; do
        [[ -x $bin ]] || { echo "missing $bin: cargo build --release -p tessera-broker -p tessera-bench" >&2; exit 2; }
    done
}

# The scripts' EXIT trap (`trap cleanup_pids_and_work EXIT`): ends every process in
# the caller's `pids` array and removes its `work` directory.
# shellcheck disable=SC2154 # pids is the caller's
cleanup_pids_and_work() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "${work:-}"
}

# A free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits up to 10 s for something to listen on 127.0.0.1:$1.
wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on $1" >&2
    return 1
}

# Waits up to 30 s for a Tessera's admin port $1 to answer /ready (needs curl).
wait_ready() {
    for _ in $(seq 150); do
        curl -sf "http://127.0.0.1:$1/ready" >/dev/null && return 0
        sleep 0.2
    done
    echo "not ready: admin port $1" >&2
    return 1
}

# record_report SETUP CASE RC BENCH_OUT BENCH_ERR OUT: appends the JSON report (the last
# line of BENCH_OUT) of one `bench --json` run as {"setup","case","report"} to OUT; a run
# the bench judged FAIL (exit RC != 0) is recorded too (its report says why: loss,
# errors, an unfinished drain). Says on stderr when there is no report or a FAIL.
record_report() {
    local setup=$1 case=$2 rc=$3 out=$4 err=$5 dest=$6 line
    line=$(tail -n 1 "$out")
    if [[ $line != "{"* ]]; then
        echo "bench gave no report (exit $rc): $setup $case: $(tail -5 "$err")" >&2
        return 0
    fi
    ((rc == 0)) || echo "bench judged FAIL: $setup $case: $(grep -E 'FAIL|lost' "$out" | head -3)" >&2
    printf '{"setup":"%s","case":"%s","report":%s}\n' "$setup" "$case" "$line" >>"$dest"
}

# A throw-away CA (DIR/ca.pem, ca.key) and a server certificate for IP signed by
# it (DIR/srv.pem, srv.key; CN and subjectAltName IP), valid two days.
make_server_cert() {
    local dir=$1 ip=$2
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -keyout "$dir/ca.key" -out "$dir/ca.pem" -subj /CN=bench-ca 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$dir/srv.key" -out "$dir/srv.csr" -subj "/CN=$ip" 2>/dev/null
    printf 'subjectAltName=IP:%s\n' "$ip" > "$dir/ext"
    openssl x509 -req -in "$dir/srv.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -CAcreateserial -days 2 -extfile "$dir/ext" -out "$dir/srv.pem" 2>/dev/null
}
