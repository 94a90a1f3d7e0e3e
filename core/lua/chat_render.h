/* chat_render.h — records to training examples: each conversation goes through a chat
 * template (a Lua function of lua/moontune/chat.lua, the model's own Jinja template
 * rendered by lua/moontune/jinja.lua, or one the recipe passes), whose text is
 * tokenized and whose spans mark the tokens to train on. */
#ifndef MT_CORE_RENDER_H
#define MT_CORE_RENDER_H

#include <lua.h>

#include "text/dataset.h"
#include "text/tokenizer.h"

/* Resolves a template name and pushes the template's render function onto the Lua
 * stack (chat.resolve in lua/moontune/chat.lua). "auto" or NULL: the tokenizer's
 * chat_template — through the hand-written function of its family when detect() names
 * one and that function renders probe conversations exactly like the template, through
 * the Jinja engine otherwise; "jinja": the tokenizer's chat_template through the
 * engine; any other name: that hand-written template. *resolved receives the name
 * ("jinja" for the engine); it stays valid while the state is open. */
mt_status mt_chat_template_push(lua_State *L, const mt_tokenizer *tok, const char *name,
                                const char **resolved, mt_error *err);

/* Renders every record with the render function on top of the stack (which stays
 * there) and adds the examples to `out`. Plain-text records are trained on whole;
 * preference pairs are refused (they need a preference loss). Errors name the file
 * and line of the record. */
mt_status mt_examples_from_records(lua_State *L, const mt_tokenizer *tok,
                                   const mt_record_set *records, mt_example_set *out,
                                   mt_error *err);

/* Loads JSONL files and turns their records into examples through the chat template
 * `template_name` ("auto": detected from the tokenizer). records (optional) receives
 * the records read. */
mt_status mt_examples_from_files(const char *const *paths, int n_paths,
                                 const mt_jsonl_options *jsonl, const mt_tokenizer *tok,
                                 const char *template_name, mt_example_set *out,
                                 mt_record_set *records, mt_error *err);

#endif
