# Sourced by the *_check.sh scripts: the one change the host build makes to a kernel's source.
#
# host_kernel_source SRC DST writes SRC to DST with every __shared__ array declaration made a
# pointer into the emulated shared memory (cuda_mock.h), on the same line, so that diagnostics
# keep their line numbers:
#   __shared__ [__align__(A)] TYPE NAME[SIZE];
#     -> TYPE* NAME = (TYPE*)mock_shared(sizeof(TYPE) * (SIZE), A or alignof(TYPE), __FILE__,
#                                        __LINE__);
#   extern __shared__ [__align__(A)] TYPE NAME[];
#     -> TYPE* NAME = (TYPE*)mock_dynamic_shared(A or alignof(TYPE));
# It fails if any __shared__ is left outside comments: a declaration of another form (two
# dimensions, an initialiser) needs this rewrite extended, not silently dropped.
host_kernel_source() {
    local src=$1 dst=$2
    perl -pe '
        BEGIN {
            $align = qr/(?:__align__\(\s*(\d+)\s*\)\s+)?/;
            $type_and_name = qr/(\w+(?:\s+\w+)*?)\s+(\w+)/;
        }
        sub alignment { defined $_[0] ? $_[0] : "alignof($_[1])" }
        s{\bextern\s+__shared__\s+$align$type_and_name\s*\[\s*\]\s*;}
         {"$2* $3 = ($2*)mock_dynamic_shared(" . alignment($1, $2) . ");"}ge;
        s{\b__shared__\s+$align$type_and_name\s*\[([^\[\]]+)\]\s*;}
         {"$2* $3 = ($2*)mock_shared(sizeof($2) * ($4), " . alignment($1, $2)
          . ", __FILE__, __LINE__);"}ge;
    ' "$src" > "$dst"
    local left
    left=$(sed 's://.*$::' "$dst" | grep -n '__shared__' || true)
    if [ -n "$left" ]; then
        echo "error: $src: __shared__ declarations the host build cannot rewrite:" >&2
        echo "$left" >&2
        return 1
    fi
}
