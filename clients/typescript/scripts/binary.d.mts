/** The repository's root directory. */
export declare const root: string;
/** The essayflow binary: $ESSAYFLOW_BIN, else $CARGO_TARGET_DIR/debug/essayflow, else target/debug/essayflow. */
export declare function essayflowBinary(): string;
