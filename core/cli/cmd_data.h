/* cmd_data.h — `moontune data`: read a dataset, apply the chat template, tokenize,
 * and print its statistics (what a recipe would train on), without training. */
#ifndef MT_CORE_CMD_DATA_H
#define MT_CORE_CMD_DATA_H

/* argv[0] is "data". Returns the exit status. */
int mt_cmd_data(int argc, char **argv);

#endif
