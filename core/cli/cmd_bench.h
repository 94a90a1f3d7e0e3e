/* cmd_bench.h — `moontune bench`: forward+backward throughput on random weights. */
#ifndef MT_CLI_CMD_BENCH_H
#define MT_CLI_CMD_BENCH_H

/* argv[0] is "bench". Returns the exit status. */
int mt_cmd_bench(int argc, char **argv);

#endif
