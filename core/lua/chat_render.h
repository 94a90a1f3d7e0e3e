/* chat_render.h — records to training examples: each conversation goes through a chat
 * template (a Lua function of lua/moontune/chat.lua, or one the recipe passes),
 * whose text is tokenized and whose spans mark the tokens to train on. */
#ifndef MT_CORE_RENDER_H
#define MT_CORE_RENDER_H

#include <lua.h>

#include "text/dataset.h"
#include "text/tokenizer.h"

/* Resolves a template name ("auto" or NULL: detect it from the tokenizer's
 * chat_template, refusing one that matches no known family) and pushes the
 * template's render function onto the Lua stack. *resolved receives the name. */
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
