# Shell (bash) twins of ../_fakedb.py, sourced by the stand-ins in this folder:
# the same files (a key's name percent-encoded, as urllib.parse.quote(key, safe=""):
# every byte but ASCII letters, digits and _.-~ as %XX, uppercase), about 2 ms a
# start against 8 for the Python ones, nearer the real C tools.  The benchmark
# times the shell originals with these too (tests/tools/bench_originals.py).  Keys that
# are not UTF-8 are encoded byte by byte here; the Python ones fail on them.

fakedb_quote() {  # sets REPLY to the file name of key $1
    local LC_ALL=C key=$1 out='' c i
    case $key in
    (*[!A-Za-z0-9_.~/-]*) ;;
    (*) REPLY=${key//\//%2F}; return;;
    esac
    for ((i = 0; i < ${#key}; i++)); do
        c=${key:i:1}
        case $c in
        ([A-Za-z0-9_.~-]) out+=$c;;
        (*) printf -v c '%%%02X' "'$c"; out+=$c;;
        esac
    done
    REPLY=$out
}

fakedb_store() {  # sets REPLY to the folder named by variable $1
    REPLY=${!1}
    if [ -z "$REPLY" ]; then
        printf '%s: %s is not set\n' "${0##*/}" "$1" >&2
        exit 1
    fi
}

fakedb_read() {  # folder key: sets REPLY to the value; status 1 when missing
    fakedb_quote "$2"
    local file=$1/$REPLY
    [ -f "$file" ] || return 1
    IFS= read -r -d '' REPLY < "$file" || :
}

fakedb_xenstore_key() {  # sets REPLY to the absolute path of $1 (xenstored's rule)
    case $1 in
    (/*) REPLY=$1;;
    (*) REPLY=/local/domain/${FAKE_XENSTORE_DOMID:-0}/$1;;
    esac
}
