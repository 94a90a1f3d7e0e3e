/* sandbox.h — what a shared recipe may do: no processes, no C code, no debug
 * library, no binary chunks, files read only under its allowed roots and written
 * only under its output directory. `moontune run --unsafe` skips mt_sandbox_install.
 *
 * Rules (enforced by C functions whose originals live only in upvalues, and an
 * allow-list kept in the registry, so nothing a recipe can reach widens them):
 *   os       keeps clock, date, difftime, getenv, time; execute, exit, remove,
 *            rename, setlocale, tmpname raise "sandbox: os.X is not allowed ...".
 *   io       popen refused; open/lines/input/output check their path: a mode with
 *            w, a or + needs a write root, any other a read root. read, write,
 *            close, type, tmpfile, stdin/stdout/stderr stay as they are.
 *   package  loadlib and searchpath refused; cpath emptied; searchers become
 *            { preload, Lua files under the recipe directory then moontune's Lua
 *            directory } (package.path is ignored). A required file must be readable.
 *   debug    replaced (global and package.loaded) by a table with traceback only.
 *   load     always text mode ("t"); loadfile and dofile also check the path.
 * Read roots: the recipe directory, moontune's Lua directory, paths->read_roots,
 * the write roots, and whatever mt_sandbox_allow_read adds. Write roots:
 * paths->out_dir and whatever mt_sandbox_allow_write adds.
 * A path is made absolute against the working directory; its longest existing
 * prefix is resolved with realpath (so ../ and symlinks are followed before the
 * check) and the non-existing rest may not contain "." or ".." components. It is
 * allowed when equal to a root or below it ("<root>/..."). */
#ifndef MT_CORE_SANDBOX_H
#define MT_CORE_SANDBOX_H

#include <lua.h>

#include "moontune/moontune.h"

typedef struct mt_sandbox_paths {
    const char *recipe_dir;         /* required: where the recipe and its team libraries live */
    const char *out_dir;            /* optional (NULL: the recipe writes nothing); need not exist yet */
    const char *const *read_roots;  /* optional: data and model paths, files or directories */
    int n_read_roots;
} mt_sandbox_paths;

/* Installs the sandbox on a state made by mt_lua_open (standard libraries loaded,
 * moontune's package.path set). Installing twice is refused. */
mt_status mt_sandbox_install(lua_State *L, const mt_sandbox_paths *paths, mt_error *err);

/* Widens the allow-list of an installed sandbox; for the trusted C layer only (the
 * binding that handles a recipe's declared data/model paths and output directory).
 * Never expose these to recipe code. MT_ERR_INVALID_ARG when L has no sandbox. */
mt_status mt_sandbox_allow_read(lua_State *L, const char *path, mt_error *err);
mt_status mt_sandbox_allow_write(lua_State *L, const char *path, mt_error *err);

/* For the C functions a recipe calls that write (or read) files themselves, such as
 * checkpoints: raises the sandbox's Lua error unless the path is allowed; does nothing
 * without a sandbox. */
void mt_sandbox_check_path(lua_State *L, const char *path, int write, const char *what);

/* Resolves path into out (PATH_MAX bytes) as the sandbox does: absolute against the
 * working directory, the longest existing prefix through realpath, the rest appended as
 * is (it may hold no "." or ".." and not start at a dangling symlink). NULL on success,
 * else the reason. */
const char *mt_path_resolve(const char *path, char *out);
/* 1 when the resolved path is root itself or lies below it. */
int mt_path_under(const char *resolved, const char *root);

/* 1 when mt_sandbox_install has run on L. */
int mt_sandbox_active(lua_State *L);

#endif
