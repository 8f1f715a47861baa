"""One run: the loaded workspace (config, run directory, data, model, oracles: workspace), its
start-up checks of what the run directory holds (checks), held-out evaluation cached in the run
directory (heldout) and the summary tables the CLI prints (summary_table). It may import every
package below it: compo.core, compo.data, compo.scoring, compo.train and compo.zo."""
