/* cmd_eval.h — `moontune eval`: held-out loss and perplexity of a model on a dataset. */
#ifndef MT_CORE_CMD_EVAL_H
#define MT_CORE_CMD_EVAL_H

/* argv[0] is "eval". Returns the exit status. */
int mt_cmd_eval(int argc, char **argv);

#endif
