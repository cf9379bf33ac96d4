#!/usr/bin/env bash
# CRIU's own zdtm tests in their lazy-pages modes, for the CRIU that make
# setup built (scripts/criu-patches applied) against CRIU as released:
#
#   make zdtm-lazy [ZDTM_DIR=/tmp/hybridmig-zdtm] [ZDTM_TESTS="maps00 cow00 ..."]
#
# zdtm builds test programs and writes into the tree it runs from, so it
# runs in copies outside build/: ZDTM_DIR/patched (a copy of build/criu's
# patched source, CRIU built there already) and ZDTM_DIR/released (the
# release tarball, unpatched, built once). Each CRIU runs the same tests in
# zdtm's --lazy-pages (plain dump, restore through a lazy-pages daemon
# reading the images) and --lazy-migrate (dump --lazy-pages, restore
# fetching pages from the dump's page server) modes; the patched one also
# in --lazy-migrate with the options of hybridmig's switch-over,
# --lazy-pages-in-place and --early-vmas (a wrapper adds them to lazy dumps). The ns flavour only (-f ns: in the host one a lazy-migrate restore
# finds its pids taken by the dumped tree, still there). The list is the memory-related subset of zdtm/static (the whole
# suite takes hours here). Prints pass/fail counts per run; the reports
# stay in ZDTM_DIR/reports. Exit 1 if the patched CRIU fails a test the
# released one passes in the same mode.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

CRIU_VERSION=4.2.1
SRC=${ZDTM_CRIU_SRC:-$ROOT/build/criu/criu-$CRIU_VERSION}  # the patched tree to test
TARBALL=$ROOT/build/criu/criu_${CRIU_VERSION}.orig.tar.xz
DIR=${ZDTM_DIR:-/tmp/hybridmig-zdtm}
TESTS=${ZDTM_TESTS:-"cow00 cow01 env00 futex maps00 maps01 maps02 maps04 maps05 maps06 maps09 maps10 maps11
maps12 maps_file_prot mem-touch mprotect00 pthread00 pthread01 pthread02 grow_map grow_map02 grow_map03
sigaltstack thp_disable uffd-events vdso00 vdso01 vdso02 zombie00 shm shm-unaligned memfd00"}
PER_TEST_TIMEOUT=${ZDTM_TIMEOUT:-120}

say() { printf '== %s\n' "$*"; }
if [ "$(id -u)" != 0 ]; then
    echo "zdtm-lazy: must run as root (zdtm checkpoints and restores)" >&2
    exit 1
fi
# zdtm.py runs on the system's python3 (it re-executes itself): it needs yaml and protobuf
if ! PATH=/usr/bin:/bin python3 -c 'import yaml, google.protobuf' 2>/dev/null; then
    echo "zdtm-lazy: /usr/bin/python3 lacks yaml or protobuf: apt-get install python3-yaml python3-protobuf" >&2
    exit 1
fi
for f in "$SRC/criu/criu" "$TARBALL"; do
    [ -e "$f" ] || { echo "zdtm-lazy: $f missing: run make setup first" >&2; exit 1; }
done
mkdir -p "$DIR/reports"

# the patched tree: a copy of build/'s (objects included), refreshed when
# build/'s CRIU changes (its patch stamp)
if [ "$(cat "$DIR/patched/.hybridmig-patches" 2>/dev/null)" != "$(cat "$SRC/.hybridmig-patches")" ]; then
    say "copying $SRC to $DIR/patched"
    rm -rf "$DIR/patched"
    cp -a "$SRC" "$DIR/patched"
fi
if [ ! -x "$DIR/released/criu/criu" ]; then
    say "building CRIU $CRIU_VERSION as released in $DIR/released"
    rm -rf "$DIR/released" "$DIR/criu-$CRIU_VERSION"
    tar -C "$DIR" -xf "$TARBALL"
    mv "$DIR/criu-$CRIU_VERSION" "$DIR/released"
    make -C "$DIR/released" -j"$(nproc)" criu >"$DIR/released.build.log" 2>&1 || {
        echo "zdtm-lazy: building the released CRIU failed: $DIR/released.build.log" >&2
        exit 1
    }
fi

# --lazy-pages-in-place and --early-vmas for lazy dumps only: zdtm has no option for them
cat >"$DIR/criu-in-place" <<EOF
#!/bin/sh
case " \$* " in
*" dump "*" --lazy-pages "*)
    echo "\$*" >>"$DIR/reports/in-place-dumps"
    exec "$DIR/patched/criu/criu" "\$@" --lazy-pages-in-place --early-vmas ;;
esac
exec "$DIR/patched/criu/criu" "\$@"
EOF
chmod +x "$DIR/criu-in-place"

# zdtm runs its tests as uid 18943, and CRIU then needs CAP_SYS_RESOURCE
# to read their rlimits: where root lacks it (some sandboxes), the copies'
# zdtm.py runs them as root, as it does its 'suid' tests
no_sys_resource() {
    local eff
    eff=$(awk '/^CapEff:/ {print $2}' /proc/self/status)
    [ $(( (0x$eff >> 24) & 1 )) = 0 ]
}

build_tests() {
    local tree=$1 t
    if no_sys_resource; then
        sed -i "s/if not test_flag(self.__desc, 'suid'):/if False:  # zdtm-lazy.sh: no CAP_SYS_RESOURCE/" \
            "$tree/test/zdtm.py"
    fi
    [ -f "$tree/lib/pycriu/rpc_pb2.py" ] || make -C "$tree" lib >"$tree/zdtm-build.log" 2>&1
    make -C "$tree/test/zdtm/lib" -j"$(nproc)" >>"$tree/zdtm-build.log" 2>&1
    for t in $TESTS; do
        make -C "$tree/test/zdtm/static" "$t" >>"$tree/zdtm-build.log" 2>&1 || {
            echo "zdtm-lazy: cannot build zdtm/static/$t in $tree ($tree/zdtm-build.log)" >&2
            exit 1
        }
    done
    make -C "$tree/test" umount2 zdtm_ct >>"$tree/zdtm-build.log" 2>&1
}

# run TREE CRIU_BIN NAME MODE: zdtm.py test by test (each bounded);
# NAME.pass, NAME.fail and NAME.skip (zdtm's own skips: "nolazy" tests) list them
run_mode() {
    local tree=$1 bin=$2 name=$3 mode=$4 t rc log
    : >"$DIR/reports/$name.pass"
    : >"$DIR/reports/$name.fail"
    : >"$DIR/reports/$name.skip"
    for t in $TESTS; do
        rc=0
        log=$DIR/reports/$name.$t.log
        (cd "$tree/test" && PATH=/usr/sbin:/usr/bin:/sbin:/bin timeout "$PER_TEST_TIMEOUT" \
            ./zdtm.py run -t "zdtm/static/$t" -f ns "$mode" --criu-bin "$bin" --keep-going) >"$log" 2>&1 || rc=$?
        if [ $rc = 0 ] && grep -q "^Skipping zdtm/static/$t" "$log"; then
            echo "$t" >>"$DIR/reports/$name.skip"
        elif [ $rc = 0 ] && grep -q "Test zdtm/static/$t PASS" "$log"; then
            echo "$t" >>"$DIR/reports/$name.pass"
        else
            echo "$t (exit $rc)" >>"$DIR/reports/$name.fail"
        fi
    done
    printf '%-30s %2d passed, %2d failed, %2d skipped by zdtm; failed: %s\n' "$name" \
        "$(wc -l <"$DIR/reports/$name.pass")" "$(wc -l <"$DIR/reports/$name.fail")" \
        "$(wc -l <"$DIR/reports/$name.skip")" "$(tr '\n' ' ' <"$DIR/reports/$name.fail")"
}

say "building zdtm's lib and $(echo $TESTS | wc -w) static tests in both trees"
build_tests "$DIR/released"
build_tests "$DIR/patched"

say "running (reports: $DIR/reports)"
run_mode "$DIR/released" "$DIR/released/criu/criu" released-lazy-pages --lazy-pages
run_mode "$DIR/patched" "$DIR/patched/criu/criu" patched-lazy-pages --lazy-pages
run_mode "$DIR/released" "$DIR/released/criu/criu" released-lazy-migrate --lazy-migrate
run_mode "$DIR/patched" "$DIR/patched/criu/criu" patched-lazy-migrate --lazy-migrate
: >"$DIR/reports/in-place-dumps"
run_mode "$DIR/patched" "$DIR/criu-in-place" patched-lazy-migrate-in-place --lazy-migrate
echo "  (of which $(wc -l <"$DIR/reports/in-place-dumps") dumps with --lazy-pages-in-place --early-vmas)"

# a regression: a test the released CRIU passes that the patched one does not
status=0
for mode in lazy-pages lazy-migrate lazy-migrate-in-place; do
    base=released-${mode%-in-place}
    for t in $(comm -23 <(sort "$DIR/reports/$base.pass") <(sort "$DIR/reports/patched-$mode.pass")); do
        echo "zdtm-lazy: REGRESSION: $t passes with the released CRIU (--${mode%-in-place}) but not patched-$mode" >&2
        status=1
    done
done
exit $status
