/* cmd_export.h — `moontune export`: a run, checkpoint or adapter as a PEFT adapter, a
 * merged Hugging Face directory or a GGUF file. */
#ifndef MT_CORE_CMD_EXPORT_H
#define MT_CORE_CMD_EXPORT_H

/* argv[0] is "export". Returns the exit status. */
int mt_cmd_export(int argc, char **argv);

#endif
