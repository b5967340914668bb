/* Replays the fuzz inputs through the fuzzers' own per-input bodies
 * (tests/fuzz/fuzz_common.h), without libFuzzer:
 *   tests/fuzz/regress/<target>-<name>   inputs that once crashed or broke an
 *                                        invariant (target: fuzz_container or
 *                                        fuzz_tile)
 *   tests/fuzz/corpus/<target>/           every seed there (make_seeds.c)
 * Paths are relative to the repository root: $NZ_REPO_ROOT, else the current
 * directory when it holds tests/fuzz/corpus, else two levels above this
 * binary (build/tests/). An invariant violation fails the test. */
#include "test_util.h"

#include <stdio.h>

/* before fuzz_common.h: invariant violations become cmocka failures */
#define FUZZ_FAIL(...)                                                                                       \
    do {                                                                                                     \
        print_error("fuzz invariant violated (%s:%d): ", __FILE__, __LINE__);                                \
        print_error(__VA_ARGS__);                                                                            \
        print_error("\n");                                                                                   \
        fail();                                                                                              \
    } while (0)
#include "fuzz/fuzz_common.h"

#include <dirent.h>
#include <libgen.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

static char g_root[PATH_MAX];

static int is_dir(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISDIR(st.st_mode);
}

static void find_root(void) {
    char probe[PATH_MAX + 64];
    const char *env = getenv("NZ_REPO_ROOT");
    if (env && *env) {
        snprintf(g_root, sizeof g_root, "%s", env);
        return;
    }
    if (is_dir("tests/fuzz/corpus")) {
        snprintf(g_root, sizeof g_root, ".");
        return;
    }
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n > 0) {
        exe[n] = 0;
        snprintf(g_root, sizeof g_root, "%s/../..", dirname(exe)); /* build/tests/x -> root */
        snprintf(probe, sizeof probe, "%s/tests/fuzz/corpus", g_root);
        if (is_dir(probe)) return;
    }
    g_root[0] = 0;
}

static uint8_t *read_all(const char *path, size_t *len) {
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    assert_int_equal(fseek(fp, 0, SEEK_END), 0);
    long n = ftell(fp);
    assert_true(n >= 0);
    assert_int_equal(fseek(fp, 0, SEEK_SET), 0);
    uint8_t *buf = malloc(n ? (size_t)n : 1); /* exact size */
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, fp), (size_t)n);
    fclose(fp);
    *len = (size_t)n;
    return buf;
}

typedef void (*one_fn)(const uint8_t *, size_t);

static one_fn target_fn(const char *target) {
    if (!strcmp(target, "fuzz_container")) return fuzz_container_one;
    if (!strcmp(target, "fuzz_tile")) return fuzz_tile_one;
    if (!strcmp(target, "fuzz_safetensors")) return fuzz_safetensors_one;
    return NULL;
}

/* Run every regular file of dir (sorted, dot files skipped). When target is
 * NULL the target is the file name up to its first '-'. @return files run,
 * or -1 when dir does not exist. */
static int run_dir(const char *dir, const char *target) {
    struct dirent **ents;
    int n = scandir(dir, &ents, NULL, alphasort);
    if (n < 0) return -1;
    int ran = 0;
    for (int i = 0; i < n; i++) {
        const char *name = ents[i]->d_name;
        char path[PATH_MAX * 2];
        snprintf(path, sizeof path, "%s/%s", dir, name);
        struct stat st;
        if (name[0] == '.' || stat(path, &st) != 0 || !S_ISREG(st.st_mode)) {
            free(ents[i]);
            continue;
        }
        char tgt[64];
        if (target) {
            snprintf(tgt, sizeof tgt, "%s", target);
        } else {
            size_t k = strcspn(name, "-");
            snprintf(tgt, sizeof tgt, "%.*s", (int)(k < sizeof tgt ? k : sizeof tgt - 1), name);
        }
        one_fn fn = target_fn(tgt);
        if (!fn) fail_msg("%s: unknown fuzz target '%s' (name files <target>-<name>)", path, tgt);
        size_t len;
        uint8_t *data = read_all(path, &len);
        print_message("  %s (%zu bytes)\n", path, len);
        fn(data, len);
        free(data);
        free(ents[i]);
        ran++;
    }
    free(ents);
    return ran;
}

static void need_root(void) {
    if (!g_root[0])
        fail_msg("cannot find tests/fuzz/corpus: run from the repository root or set NZ_REPO_ROOT");
}

static void test_seeds(const char *target) {
    need_root();
    char dir[PATH_MAX + 64];
    snprintf(dir, sizeof dir, "%s/tests/fuzz/corpus/%s", g_root, target);
    int ran = run_dir(dir, target);
    if (ran < 1) fail_msg("%s: no seeds (regenerate with tests/fuzz/make_seeds.c)", dir);
}

static void test_container_seeds(void **state) {
    (void)state;
    test_seeds("fuzz_container");
}

static void test_tile_seeds(void **state) {
    (void)state;
    test_seeds("fuzz_tile");
}

static void test_safetensors_seeds(void **state) {
    (void)state;
    test_seeds("fuzz_safetensors");
}

static void test_regressions(void **state) {
    (void)state;
    need_root();
    char dir[PATH_MAX + 64];
    snprintf(dir, sizeof dir, "%s/tests/fuzz/regress", g_root);
    int ran = run_dir(dir, NULL);
    print_message("  %d regression input(s)\n", ran < 0 ? 0 : ran);
}

/* The harness itself: a few hand-made inputs that must be handled quietly. */
static void test_edge_inputs(void **state) {
    (void)state;
    static const uint8_t magic[8] = {0x89, 'N', 'Z', 'P', '\r', '\n', 0x1a, '\n'};
    uint8_t buf[128] = {0};
    fuzz_container_one(buf, 0);
    fuzz_container_one(magic, sizeof magic);
    memcpy(buf, magic, 8);
    buf[8] = 1;
    fuzz_container_one(buf, 64);  /* header_len 0, data_offset 0: inconsistent */
    buf[24] = 128;                /* data_offset 128, header "" */
    fuzz_container_one(buf, 128); /* empty header is not JSON */
    fuzz_tile_one(buf, 0);
    uint8_t tile[FUZZ_TILE_HDR + 8] = {0};
    fuzz_tile_one(tile, FUZZ_TILE_HDR);
    fuzz_tile_one(tile, sizeof tile);
    tile[10] = 200; /* K pairs that are not there */
    fuzz_tile_one(tile, sizeof tile);
}

int main(void) {
    find_root();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_edge_inputs), cmocka_unit_test(test_container_seeds),
        cmocka_unit_test(test_tile_seeds),  cmocka_unit_test(test_safetensors_seeds),
        cmocka_unit_test(test_regressions),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
