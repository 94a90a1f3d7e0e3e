/* cmd_run.c — `moontune run RECIPE.lua`: a Lua state with the moontune library, the
 * global `arg` describing the command line, and the recipe run under one protected call
 * with a traceback handler. Interpreting --set and --resume is the Lua layer's policy. */
#define _DEFAULT_SOURCE /* realpath */
#include "cli/cmd_run.h"

#include <dirent.h>
#include <errno.h>
#include <lauxlib.h>
#include <limits.h>
#include <lua.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/cli_args.h"
#include "lua/lua_state.h"
#include "lua/bindings.h"
#include "lua/run_dir.h"
#include "base/internal.h"
#include "lua/sandbox.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: moontune run RECIPE.lua [--unsafe] [--resume [PATH]] [--allow-changes]\n"
            "                    [--overwrite] [--device cpu|cuda] [--set key=value ...]\n"
            "\n"
            "Runs a Lua recipe with the moontune library (require(\"moontune\")).\n"
            "  --unsafe           run without the recipe sandbox (full io/os access)\n"
            "  --resume [PATH]    continue from PATH, or from the run's latest checkpoint\n"
            "  --allow-changes    resume although the recipe or its settings changed since the\n"
            "                     checkpoint (the changes are printed and logged)\n"
            "  --overwrite        start afresh in an output directory that holds an earlier run,\n"
            "                     after moving that run aside (to DIR.old-TIME; nothing is deleted)\n"
            "  --device D         cpu | cuda: where mt.model puts a model whose recipe names no\n"
            "                     device (default: cuda where a CUDA device is usable, else\n"
            "                     cpu); mt.device() returns it\n"
            "  --set key=value    override a recipe setting (repeatable)\n");
}

/* Sets the global `arg`: {[0] = recipe, recipe = recipe, set = {"k=v", ...},
 * resume = path | true | nil, unsafe = bool}. */
static void push_arg(lua_State *L, const char *recipe, const char *const *sets, int n_sets,
                     const char *resume_path, int resume, int unsafe) {
    lua_newtable(L);
    lua_pushstring(L, recipe);
    lua_rawseti(L, -2, 0);
    lua_pushstring(L, recipe);
    lua_setfield(L, -2, "recipe");
    lua_createtable(L, n_sets, 0);
    for (int i = 0; i < n_sets; i++) {
        lua_pushstring(L, sets[i]);
        lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -2, "set");
    if (resume) {
        if (resume_path) lua_pushstring(L, resume_path);
        else lua_pushboolean(L, 1);
        lua_setfield(L, -2, "resume");
    }
    lua_pushboolean(L, unsafe);
    lua_setfield(L, -2, "unsafe");
    lua_setglobal(L, "arg");
}

/* Prepends the recipe's directory to package.path. */
static void add_recipe_dir(lua_State *L, const char *recipe) {
    const char *slash = strrchr(recipe, '/');
    lua_getglobal(L, "package");
    if (slash) {
        lua_pushlstring(L, recipe, (size_t)(slash - recipe) + 1);
        const char *dir = lua_tostring(L, -1);
        lua_getfield(L, -2, "path");
        lua_pushfstring(L, "%s?.lua;%s?/init.lua;%s", dir, dir, lua_tostring(L, -1));
        lua_setfield(L, -4, "path");
        lua_pop(L, 2);
    } else {
        lua_getfield(L, -1, "path");
        lua_pushfstring(L, "./?.lua;./?/init.lua;%s", lua_tostring(L, -1));
        lua_setfield(L, -3, "path");
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

enum { OPT_UNSAFE = 256, OPT_OVERWRITE, OPT_ALLOW_CHANGES, OPT_RESUME, OPT_SET };

static const struct option options[] = {
    {"help", no_argument, NULL, MT_CLI_HELP},
    {"unsafe", no_argument, NULL, OPT_UNSAFE},
    {"overwrite", no_argument, NULL, OPT_OVERWRITE},
    {"allow-changes", no_argument, NULL, OPT_ALLOW_CHANGES},
    {"resume", optional_argument, NULL, OPT_RESUME},
    {"set", required_argument, NULL, OPT_SET},
    MT_CLI_DEVICE_OPTION,
    {NULL, 0, NULL, 0},
};

int mt_cmd_run(int argc, char **argv) {
    const char *recipe = NULL, *resume_path = NULL, *device = NULL;
    static const mt_cli cli = {"moontune run", options, usage, NULL, 0};
    int resume = 0, unsafe = 0, n_sets = 0, overwrite = 0, allow_changes = 0;
    const char **sets = calloc((size_t)(argc > 0 ? argc : 1), sizeof *sets);
    if (!sets) {
        fprintf(stderr, "moontune run: out of memory\n");
        return 1;
    }
    mt_cli_begin();
    const char *v, *flag;
    int c;
    while ((c = mt_cli_next(&cli, argc, argv, &v, &flag)) != -1) {
        switch (c) {
        case MT_CLI_HELP: free(sets); return 0;
        case MT_CLI_REFUSED: free(sets); return 2;
        case OPT_UNSAFE: unsafe = 1; break;
        case OPT_OVERWRITE: overwrite = 1; break;
        case MT_CLI_DEVICE: device = v; break;
        case OPT_ALLOW_CHANGES: allow_changes = 1; break;
        case OPT_RESUME:
            resume = 1;
            if (v) {
                resume_path = v;
            } else if (optind < argc && argv[optind][0] != '-' &&
                       (recipe || !mt_ends_with(argv[optind], ".lua"))) {
                /* an optional path: the next word, unless it is an option or the recipe */
                resume_path = argv[optind++];
            }
            break;
        case OPT_SET:
            if (!strchr(v, '=')) {
                fprintf(stderr, "moontune run: --set needs key=value\n");
                usage(stderr);
                free(sets);
                return 2;
            }
            sets[n_sets++] = v;
            break;
        case MT_CLI_POSITIONAL:
            if (recipe) {
                fprintf(stderr, "moontune run: more than one recipe ('%s' and '%s')\n", recipe, v);
                free(sets);
                return 2;
            }
            recipe = v;
            break;
        }
    }
    if (!recipe) {
        usage(stderr);
        free(sets);
        return 2;
    }
    if (resume_path && access(resume_path, F_OK) != 0) {
        /* refused here: a recipe that never reads arg.resume would otherwise train afresh */
        fprintf(stderr, "moontune run: --resume %s: %s\n", resume_path, strerror(errno));
        free(sets);
        return 1;
    }
    if (overwrite && resume) {
        fprintf(stderr, "moontune run: --overwrite and --resume contradict each other\n");
        free(sets);
        return 2;
    }
    mt_error err = {0};
    /* the recipe as source text: the text checkpoints record, and the only form loaded
     * (a precompiled chunk bypasses the parser's checks and can crash the VM) */
    char *text = NULL;
    size_t text_len = 0;
    if (mt_read_file(recipe, &text, &text_len, &err)) {
        fprintf(stderr, "moontune run: %s\n", err.msg);
        free(sets);
        return 1;
    }
    if (text_len > 0 && text[0] == LUA_SIGNATURE[0]) {
        fprintf(stderr,
                "moontune run: %s: is a precompiled (binary) Lua chunk; recipes are loaded as "
                "Lua source text only\n",
                recipe);
        free(text);
        free(sets);
        return 1;
    }
    lua_State *L = mt_lua_open(&err);
    if (!L) {
        fprintf(stderr, "moontune run: %s\n", err.msg);
        free(text);
        free(sets);
        return 1;
    }
    mt_lua_register(L);
    mt_run_flags flags = {.recipe = recipe, .resume = resume, .overwrite = overwrite,
                          .allow_changes = allow_changes};
    mt_lua_set_run(L, &flags, text, text_len);
    push_arg(L, recipe, sets, n_sets, resume_path, resume, unsafe);
    mt_lua_set_overrides(L, sets, n_sets);
    mt_lua_set_validating(L, argc > 0 && !strcmp(argv[0], "validate"));
    mt_lua_set_device(L, device, 1);
    free(sets);
    add_recipe_dir(L, recipe);

    int rc = 0;
    if (!unsafe) { /* shared recipes run sandboxed; --unsafe trusts this one */
        char resolved[PATH_MAX];
        if (!realpath(recipe, resolved)) {
            fprintf(stderr, "moontune run: %s: %s\n", recipe, strerror(errno));
            lua_close(L);
            free(text);
            return 1;
        }
        char *slash = strrchr(resolved, '/');
        if (slash) *slash = '\0';
        mt_sandbox_paths paths = {.recipe_dir = resolved[0] ? resolved : "/"};
        if (mt_sandbox_install(L, &paths, &err) ||
            (resume_path && mt_sandbox_allow_read(L, resume_path, &err))) {
            fprintf(stderr, "moontune run: %s\n", err.msg);
            lua_close(L);
            free(text);
            return 1;
        }
    }
    /* the text read above, loaded under the file's name ("@recipe"), in text mode; a
     * first line starting with '#' is skipped as luaL_loadfile does (a shebang) */
    const char *body = text;
    size_t body_len = text_len;
    int shebang = body_len > 0 && body[0] == '#';
    if (shebang) {
        while (body_len > 0 && *body != '\n') body++, body_len--;
    }
    lua_pushfstring(L, "@%s", recipe);
    int load = luaL_loadbufferx(L, body, body_len, lua_tostring(L, -1), "t");
    lua_remove(L, -2);
    free(text);
    text = NULL;
    if (load != LUA_OK) {
        /* the message names the file and line; a binary chunk after a '#' line is
         * refused by the mode, whose message names neither */
        const char *msg = lua_tostring(L, -1);
        if (msg && strstr(msg, "binary chunk"))
            fprintf(stderr, "moontune run: %s: is a precompiled (binary) Lua chunk; recipes are "
                            "loaded as Lua source text only\n", recipe);
        else
            fprintf(stderr, "moontune run: %s\n", msg ? msg : "cannot load the recipe");
        rc = 1;
    } else if (mt_lua_pcall(L, 0, 0, &err)) {
        fprintf(stderr, "moontune run: %s\n", err.msg);
        rc = 1;
    } else if (mt_lua_overrides_unused(L)) {
        fprintf(stderr, "moontune run: --set was given but %s never reads a config table "
                        "(mt.config)\n", recipe);
        rc = 1;
    }
    lua_close(L);
    return rc;
}

static int compare_names(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The shipped recipes: recipes/ next to the Lua library (the source tree's, or the
 * installed share/moontune/recipes). */
static void recipes_dir(char *out, size_t size) {
    snprintf(out, size, "%s/../recipes", mt_lua_dir());
}

int mt_cmd_ls(int argc, char **argv) {
    (void)argc;
    (void)argv;
    char dir[PATH_MAX];
    recipes_dir(dir, sizeof dir);
    char cmd_dir[PATH_MAX];
    if (!realpath(dir, cmd_dir)) {
        fprintf(stderr, "moontune ls: no recipes directory at %s\n", dir);
        return 1;
    }
    DIR *d = opendir(cmd_dir);
    if (!d) {
        fprintf(stderr, "moontune ls: %s: %s\n", cmd_dir, strerror(errno));
        return 1;
    }
    char *names[256];
    int n = 0;
    for (struct dirent *e; (e = readdir(d)) && n < 256;) {
        size_t len = strlen(e->d_name);
        if (len > 4 && !strcmp(e->d_name + len - 4, ".lua")) names[n++] = strdup(e->d_name);
    }
    closedir(d);
    qsort(names, (size_t)n, sizeof *names, compare_names);
    printf("recipes in %s (copy one with: moontune cp NAME DEST):\n", cmd_dir);
    for (int i = 0; i < n; i++) {
        if (!names[i]) continue;
        /* the first comment line of the recipe says what it is */
        char path[PATH_MAX + 256], line[256] = "";
        snprintf(path, sizeof path, "%s/%s", cmd_dir, names[i]);
        FILE *f = fopen(path, "r");
        if (f) {
            if (fgets(line, sizeof line, f)) line[strcspn(line, "\n")] = '\0';
            fclose(f);
        }
        names[i][strlen(names[i]) - 4] = '\0';
        printf("  %-14s %s\n", names[i], line[0] == '-' ? line + strspn(line, "- ") : "");
        free(names[i]);
    }
    return 0;
}

int mt_cmd_cp(int argc, char **argv) {
    if (argc == 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
        printf("usage: moontune cp NAME DEST   (NAME from `moontune ls`; DEST a file or directory)\n");
        return 0;
    }
    if (argc != 3) {
        fprintf(stderr, "usage: moontune cp NAME DEST   (NAME from `moontune ls`; DEST a file or directory)\n");
        return 2;
    }
    char dir[PATH_MAX], src[PATH_MAX + 64], dest[PATH_MAX + 64];
    recipes_dir(dir, sizeof dir);
    const char *name = argv[1];
    size_t len = strlen(name);
    snprintf(src, sizeof src, "%s/%s%s", dir, name, len > 4 && !strcmp(name + len - 4, ".lua") ? "" : ".lua");
    if (strchr(name, '/')) {
        fprintf(stderr, "moontune cp: '%s' is not a recipe name (see moontune ls)\n", name);
        return 2;
    }
    struct stat st;
    if (stat(argv[2], &st) == 0 && S_ISDIR(st.st_mode))
        snprintf(dest, sizeof dest, "%s/%s", argv[2], strrchr(src, '/') + 1);
    else
        snprintf(dest, sizeof dest, "%s", argv[2]);
    if (stat(dest, &st) == 0) {
        fprintf(stderr, "moontune cp: %s exists; not overwriting it\n", dest);
        return 1;
    }
    char *text;
    size_t n;
    mt_error err = {0};
    if (mt_read_file(src, &text, &n, &err)) {
        fprintf(stderr, "moontune cp: no recipe named '%s' (%s); see moontune ls\n", name, err.msg);
        return 1;
    }
    mt_status rc = mt_write_file_atomic(dest, text, n, &err);
    free(text);
    if (rc) {
        fprintf(stderr, "moontune cp: %s\n", err.msg);
        return 1;
    }
    printf("copied %s to %s\n", src, dest);
    return 0;
}
