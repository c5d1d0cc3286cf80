/* The file-backed xenstore/qubesdb stand-ins of tests/kit/fakebin, as small C
 * programs that cost what the real C tools cost (~1 ms a call), for the
 * benchmark only (tests/tools/bench_lone.py compiles this with gcc at run time; the
 * suite keeps the Python ones).  One program, three names (argv[0]):
 *   xenstore-read [--] PATH...    one value per line; stops at the first
 *                                 missing path: "xenstore-read: couldn't read
 *                                 path PATH", exit 1
 *   xenstore-write PATH VALUE...  atomic writes (rename); FAKE_XENSTORE_WRITE_FAIL fails
 *   qubesdb-read [-f] [-q] [-r] [--] PATH...   "PATH = value" with -f; a
 *                                 missing key: "Failed to read PATH" (not with
 *                                 -q), the others still printed, exit 2
 * A key's file is its name with every byte but ASCII letters, digits and _.-~
 * as %XX (uppercase), in $FAKE_XENSTORE_DIR or $FAKE_QUBESDB_DIR; a relative
 * xenstore path is under /local/domain/$FAKE_XENSTORE_DOMID/ (default 0).
 * CONTRACT section 6; the same behaviour as tests/kit/fakebin/_fakedb.py. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *prog;

static void key_file(char *out, size_t size, const char *dir, const char *key) {
    static const char unreserved[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~";
    size_t n = (size_t)snprintf(out, size, "%s/", dir);
    for (const unsigned char *p = (const unsigned char *)key; *p && n + 4 < size; p++) {
        if (strchr(unreserved, *p))
            out[n++] = (char)*p;
        else
            n += (size_t)snprintf(out + n, size - n, "%%%02X", *p);
    }
    out[n] = '\0';
}

static const char *store(const char *env) {
    const char *dir = getenv(env);
    if (!dir || !*dir) {
        fprintf(stderr, "%s: %s is not set\n", prog, env);
        exit(1);
    }
    return dir;
}

static void xenstore_key(char *out, size_t size, const char *path) {
    const char *domid = getenv("FAKE_XENSTORE_DOMID");
    if (path[0] == '/')
        snprintf(out, size, "%s", path);
    else
        snprintf(out, size, "/local/domain/%s/%s", domid && *domid ? domid : "0", path);
}

/* The value of `key` in `dir`, malloc'd; NULL when missing. */
static char *read_key(const char *dir, const char *key, size_t *len) {
    char file[8192];
    key_file(file, sizeof file, dir, key);
    int fd = open(file, O_RDONLY);
    if (fd < 0)
        return NULL;
    size_t cap = 256, n = 0;
    char *buf = malloc(cap);
    ssize_t got;
    while ((got = read(fd, buf + n, cap - n)) > 0) {
        n += (size_t)got;
        if (n == cap)
            buf = realloc(buf, cap *= 2);
    }
    close(fd);
    *len = n;
    return buf;
}

static int xs_read(int argc, char **argv) {
    int i = 1;
    if (i < argc && strcmp(argv[i], "--") == 0)
        i++;
    if (i >= argc) {
        fputs("Usage: xenstore-read [-h] [-s] [-R] [-p] key [...]\n", stderr);
        return 1;
    }
    const char *dir = store("FAKE_XENSTORE_DIR");
    for (; i < argc; i++) {
        char key[4096];
        size_t len;
        xenstore_key(key, sizeof key, argv[i]);
        char *value = read_key(dir, key, &len);
        if (!value) {
            fflush(stdout);
            fprintf(stderr, "xenstore-read: couldn't read path %s\n", argv[i]);
            return 1;
        }
        fwrite(value, 1, len, stdout);
        fputc('\n', stdout);
        free(value);
    }
    return 0;
}

static int xs_write(int argc, char **argv) {
    if (argc < 3 || (argc - 1) % 2) {
        fputs("Usage: xenstore-write [-h] [-s] [-R] key value [...]\n", stderr);
        return 1;
    }
    if (getenv("FAKE_XENSTORE_WRITE_FAIL") && *getenv("FAKE_XENSTORE_WRITE_FAIL")) {
        fputs("xenstore-write: could not write path (injected failure)\n", stderr);
        return 1;
    }
    const char *dir = store("FAKE_XENSTORE_DIR");
    for (int i = 1; i + 1 < argc; i += 2) {
        char key[4096], file[8192], tmp[8300];
        xenstore_key(key, sizeof key, argv[i]);
        key_file(file, sizeof file, dir, key);
        snprintf(tmp, sizeof tmp, "%s.%d.tmp", file, (int)getpid());
        int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        size_t len = strlen(argv[i + 1]);
        if (fd < 0 || write(fd, argv[i + 1], len) != (ssize_t)len || close(fd) != 0 || rename(tmp, file) != 0) {
            fprintf(stderr, "xenstore-write: %s: %s\n", argv[i], strerror(errno));
            return 1;
        }
    }
    return 0;
}

static int qdb_read(int argc, char **argv) {
    int full = 0, quiet = 0, raw = 0, i = 1;
    for (; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0) {
            i++;
            break;
        }
        if (argv[i][0] != '-' || !argv[i][1])
            break;
        for (const char *f = argv[i] + 1; *f; f++) {
            if (*f == 'f') full = 1;
            else if (*f == 'q') quiet = 1;
            else if (*f == 'r') raw = 1;
            else {
                fprintf(stderr, "qubesdb-read: invalid option -- '%c'\n", *f);
                return 1;
            }
        }
    }
    if (i >= argc) {
        fputs("Usage: qubesdb-read [-f] [-q] [-r] path [path...]\n", stderr);
        return 1;
    }
    const char *dir = store("FAKE_QUBESDB_DIR");
    int status = 0;
    for (; i < argc; i++) {
        size_t len;
        char *value = read_key(dir, argv[i], &len);
        if (!value) {
            if (!quiet)
                fprintf(stderr, "Failed to read %s\n", argv[i]);
            status = 2;
            continue;
        }
        if (full)
            printf("%s = ", argv[i]);
        fwrite(value, 1, len, stdout);
        if (!raw)
            fputc('\n', stdout);
        free(value);
    }
    return status;
}

int main(int argc, char **argv) {
    prog = strrchr(argv[0], '/') ? strrchr(argv[0], '/') + 1 : argv[0];
    if (strcmp(prog, "xenstore-read") == 0)
        return xs_read(argc, argv);
    if (strcmp(prog, "xenstore-write") == 0)
        return xs_write(argc, argv);
    if (strcmp(prog, "qubesdb-read") == 0)
        return qdb_read(argc, argv);
    fprintf(stderr, "%s: not a stand-in name\n", prog);
    return 1;
}
