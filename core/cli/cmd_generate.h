/* cmd_generate.h — `moontune generate`: load a model (GGUF file or Hugging Face
 * directory), render the prompt with its chat template, and stream generated text. */
#ifndef MT_CORE_CMD_GENERATE_H
#define MT_CORE_CMD_GENERATE_H

/* argv[0] is "generate". Returns the exit status. */
int mt_cmd_generate(int argc, char **argv);

#endif
