/* run_dir.h — the run directory and the run's facts as Lua bindings (core/lua/run_dir.c). */
#ifndef MT_CORE_LUA_RUN_H
#define MT_CORE_LUA_RUN_H
#include <lua.h>
#include <stddef.h>

/* What the command line says about this run (moontune run / validate). */
typedef struct mt_run_flags {
    const char *recipe; /* the recipe file as given */
    int resume;         /* --resume: continue the run in the output directory */
    int overwrite;      /* --overwrite: move an earlier run in the output directory aside */
    int allow_changes;  /* --allow-changes: resume although settings or recipe changed */
} mt_run_flags;

/* Records the flags and the recipe's text for mt.output_dir and mt.run_info. */
void mt_lua_set_run(lua_State *L, const mt_run_flags *flags, const char *recipe_text,
                    size_t recipe_len);
/* Keeps a JSON copy of the resolved config table at idx (mt.config's result). */
void mt_lua_run_note_config(lua_State *L, int idx);
/* Pushes the value at idx as compact JSON text (sorted keys); raises on a cycle or a
 * string that is not UTF-8. Returns the pushed text. */
const char *mt_lua_json_encode(lua_State *L, int idx);
/* Pushes JSON text as a Lua value (null -> nil); raises naming `name`, line and column. */
void mt_lua_json_decode(lua_State *L, const char *text, size_t len, const char *name);
/* Adds output_dir, run_info, json_encode, json_decode and write_file to the table at
 * the top of the stack. */
void mt_lua_run_funcs(lua_State *L);

#endif
